"""Headless SGRS-Net engine: I/O, model, training, inference, metrics.

Nothing in this package imports qtpy, napari, magicgui or superqt.
"""
