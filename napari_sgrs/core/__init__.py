"""Headless engine (SGRS-Net, SGRS+ and the baselines): I/O, model, training, inference, metrics.

Nothing in this package imports qtpy, napari, magicgui or superqt.
"""
