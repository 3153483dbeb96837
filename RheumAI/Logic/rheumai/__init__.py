"""RheumAI: rheumatology imaging AI toolkit (the logic behind the RheumAI 3D Slicer extension).

No Slicer, Qt or VTK here. Images are SimpleITK images in DICOM/ITK LPS physical space (mm);
arrays taken from them are in numpy (k, j, i) order.
"""

__version__ = "0.1.0"
