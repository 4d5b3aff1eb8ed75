"""Where and how stages run: the Ray cluster, Ray Data settings, console output and testing aids."""
