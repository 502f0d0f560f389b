"""``chatd bench``: the bundled load tester (scenarios dm, group, storm, idle).

Layout: ``cli`` (click) → ``runner`` (coordinator: target, setup, worker processes, lockstep) →
``worker`` (one trio loop per process, pacing) → ``client`` (one simulated device, its books) over
``ws`` (lean WebSocket client); ``population`` sets users/groups up over ``httpclient``; ``report``
merges and prints, ``plot`` draws the SVG; ``histogram`` and ``seqs`` are the pure data structures.
"""
