"""organism-visual: a visual in-context-learning model organism (Hojel et al. 2024)."""
