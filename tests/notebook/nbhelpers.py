"""Shared names of the notebook tests (a module of its own: `import conftest` would be ambiguous)."""

DEMO_IMAGES = 40  # the first 40 demo images: 13 photos (domain "samples"), 27 faces ("lfw")
FACE = 20  # a face among them: the query of the tests
