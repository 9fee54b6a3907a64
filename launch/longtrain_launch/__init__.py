"""Entry points (Hydra apps) and the Ray driver / worker group; installed as `longtrain_launch`."""
