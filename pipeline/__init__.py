"""deepfake-tune: tune, track and register a deepfake-classification ensemble."""
