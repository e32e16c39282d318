"""Analysis of codes: classifiers, interventions, statistics."""
