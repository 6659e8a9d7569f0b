"""Text encoders and VAEs."""
