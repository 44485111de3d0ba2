"""Deployment and measurement code beside the library: the team stack's supervisor and scripts."""
