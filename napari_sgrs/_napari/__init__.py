"""napari faces of napari-sgrs: reader, writer, sample data and the train / review panel.

Everything that imports napari, Qt, magicgui or matplotlib lives here; the logic it drives
is in :mod:`napari_sgrs.core` (project folder, review queue, provenance in ``core/project.py``).
"""
