"""One thin Prefect task per stage, and the runner they all share."""
