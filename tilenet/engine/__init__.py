"""The engine: one image through a model, tile by tile (plan, checkpoint, predictor, stitch,
pipeline, infer)."""
