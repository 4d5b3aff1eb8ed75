"""The hyperparameter search: Optuna searcher, Tune driver state, console lines and the leaderboard."""
