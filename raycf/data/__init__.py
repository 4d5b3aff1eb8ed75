"""Images in: datasets, the decoded uint8 store, preprocessing, augmentation, views and the frozen-prefix cache."""
