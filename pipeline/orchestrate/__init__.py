"""Running the pipeline: the declared steps (steps, nightly), the plain and Prefect runners, the
run lock, pre-flight checks and Prefect's start-up."""
