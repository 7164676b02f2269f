"""Embedded offline testbed: tiny trained MoEs and synthetic multi-domain tasks."""
