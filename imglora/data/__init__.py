"""Training data: finding images and captions, opening images safely, the pre-training scan, buckets."""

# The smallest usable image side, for the trainer (TrainConfig.min_image_side) and `imglora-data check`/`stats`
# alike: smaller images are skipped. 32 px is half the embedded model's 64 px. Kept here, in a module that
# imports nothing, so the config can use it cheaply.
MIN_IMAGE_SIDE = 32
