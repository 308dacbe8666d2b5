"""Renderers: the triangle rasteriser (raster.py) and the NeRF volume renderer (volume.py)."""
