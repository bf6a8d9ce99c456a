"""Tests of modelshield.report."""
