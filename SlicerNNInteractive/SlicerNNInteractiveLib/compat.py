"""Whether a server's protocol fits this client: learned at connect from what the server reports (our server's
``/x/info`` and the official server's ``/capabilities`` both report ``inference_session_version``, the nnInteractive
version it runs), and said in one sentence with what to do when it does not."""

import re

SPOKEN = (2, 6)  # this client speaks nnInteractive 2.6's remote protocol (and any later 2.x keeps it)


def version_tuple(version):
    """(major, minor) of a version string such as "2.6.0", or None when it has none."""
    found = re.match(r"\s*(\d+)\.(\d+)", str(version or ""))
    return (int(found.group(1)), int(found.group(2))) if found else None


def version_problem(version, server_url):
    """None when a server reporting nnInteractive ``version`` speaks this client's protocol (or reports none: then
    the calls themselves tell), else the sentence saying so and what to do."""
    have = version_tuple(version)
    if have is None or (have[0] == SPOKEN[0] and have >= SPOKEN):
        return None
    if have[0] > SPOKEN[0]:
        return ("The server at %s runs nnInteractive %s, whose protocol this client (made for nnInteractive %d.%d) "
                "does not speak: update the Slicer extension (Extensions Manager) or the client library, or use a "
                "%d.x server." % (server_url, version, SPOKEN[0], SPOKEN[1], SPOKEN[0]))
    return ("The server at %s runs nnInteractive %s, older than the %d.%d remote protocol this client speaks: ask its "
            "operator to update the server (pip install -U nninteractive-slicer-server)."
            % (server_url, version, SPOKEN[0], SPOKEN[1]))
