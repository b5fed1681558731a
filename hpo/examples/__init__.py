"""Tasks for the shipped studies in search_spaces/: scikit-learn's bundled datasets, no download."""
