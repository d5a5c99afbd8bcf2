"""The typical-case library (典型案例库): candidates, review decisions, publishing, coverage."""
