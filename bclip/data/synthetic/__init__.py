"""A deterministic procedural world of captioned images (24 object classes, "banana" among them),
so that bclip can be trained, poisoned, cleaned and evaluated end to end without downloading data.

Every example is a pure function of (seed, split, index): a `Scene` of random attributes is drawn,
then rendered with vectorised numpy and described by a caption naming the object's class. The same
scene renders at any image size, so worlds at 32 and 224 px share their labels and captions.

Modules, each importing only those above it: shapes (the object classes and their painters), scenes
(sampling and rendering a scene), captions (describing a scene; the world's vocabulary), writer (whole
examples and the world on disk); `python -m bclip.data.synthetic` writes a world (__main__).
"""
