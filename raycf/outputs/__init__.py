"""What a study gives its user: the report, explanations, predictions, reruns and exports."""
