"""Code that the detect, watermark and store functions share: events, keys, errors, S3 access."""
