"""URI templates of the resources that tool results link to (the resource declarations use the same)."""

JOB = "datamachine://jobs/{job_id}"
FLOW = "datamachine://flows/{flow_id}"
PIPELINE = "datamachine://pipelines/{pipeline_id}"
