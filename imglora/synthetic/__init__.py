"""The embedded model's own world: synthetic shapes, pretraining the base model from scratch, the judge
that scores generations, and `imglora demo`. Nothing else in imglora depends on this package."""
