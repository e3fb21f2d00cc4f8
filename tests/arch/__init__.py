"""Tests of mtlfast.arch."""
