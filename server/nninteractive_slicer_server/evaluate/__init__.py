"""``nninteractive-slicer-eval``: a simulated user prompts an nnInteractive model (through a server, ours or the
official one, or in this process) on a folder of images and label maps, and reports Dice and normalised surface
distance after every prompt.

* ``simulate``: where the user's box, clicks and scribbles go (the CVPR 2025 interactive challenge's rules, with
  their sources);
* ``metrics``: Dice, NSD at a tolerance in mm, AUC;
* ``dataset``: cases from an nnU-Net raw dataset folder or two folders of files with the same names;
* ``run``: the session loop and ``steps.csv`` (resumable);
* ``report``: the summary table and ``dice.png``;
* ``cli``: the command.

It lives in the server package because it needs what the server already ships: our client (``RemoteSession``),
SimpleITK for images, and nnInteractive itself for the in-process mode; only the plot needs matplotlib (the ``eval``
extra). Nothing here is imported by the server.
"""
