"""kolm_ray."""
