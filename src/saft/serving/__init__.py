"""Serving the registered champion: requests, batched inference, the HTTP server, KServe.

Library modules (no MLflow, no Kubernetes):

* ``protocol``   request/response JSON, limits and the 4xx errors
* ``fetch``      the URL fetch policy (off by default; allow-list; private ranges refused)
* ``predictor``  the classifier over a stored head, the decode pool, the dynamic batcher
* ``bases``      base weights stored once per fingerprint: where they are found, how checked
* ``bundle``     the served model's files (delta, head, model_ref.json) and how they load
* ``wheel``      the project wheel and pins a logged model's environment installs

Above them: ``server`` (``saft serve``: the HTTP endpoint a KServe predictor runs, loading
the pyfunc of ``saft.tracking.pyfunc``), ``kserve`` (the InferenceService manifest and its
schema checks), ``kube`` (the Kubernetes API calls) and ``rollout`` (canary, promotion,
rollback), which ``saft.steps.deploy`` drives. See docs/serving.md.
"""
