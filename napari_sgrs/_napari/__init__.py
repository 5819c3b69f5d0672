"""napari faces of napari-sgrs: reader, writer, sample data and the train / review panel.

Everything that imports napari, Qt, magicgui or matplotlib lives here; the logic it drives
is in :mod:`napari_sgrs.project` (project folder, provenance, review queue, the ``sgrs`` subprocesses)
and :mod:`napari_sgrs.core`.
"""
