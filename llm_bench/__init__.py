"""Analysis that also runs outside pytest: compare stored runs, gate regressions, draw reports."""
