"""Pure-Python half of SlicerNNInteractive: no Slicer, Qt or VTK imports, Python >= 3.9 -- except
``slicerscene``, the Scene on Slicer's MRML nodes, which needs Slicer's ``slicer`` and ``vtk`` (inside Slicer,
or the slicer-core wheel that the tests install).

Usable from plain Python scripts too: put the folder ``SlicerNNInteractive`` on ``sys.path`` and
``from SlicerNNInteractiveLib.client import RemoteSession``. Submodules are imported on demand, so
importing this package costs nothing.

It has no version of its own: it ships inside the Slicer extension and inside the server package
(nninteractive-slicer-server), whose version, in ``nninteractive_slicer_server/__init__.py``, is the only one.
"""
