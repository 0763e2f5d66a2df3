"""Sample data: a generator of realistic trajectories with planted defects."""
