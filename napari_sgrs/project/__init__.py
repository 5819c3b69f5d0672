"""The napari panel's project: its folder (:mod:`.folder`), review queue (:mod:`.review`) and
background ``sgrs`` processes (:mod:`.jobs`).

Outside :mod:`napari_sgrs.core` because only the panel uses it; like the core it imports no Qt or
napari, and unlike the engine no torch (training and prediction run as ``sgrs`` subprocesses), so
the panel opens a project without loading the engine. Tests check both.
"""
