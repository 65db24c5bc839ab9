"""Serving the registered champion: requests, batched inference, the HTTP server, KServe.

Library modules (no MLflow, no Kubernetes):

* ``protocol``   KServe V1 request/response JSON, limits, the 4xx errors, JSON of any shape
* ``protocol_v2`` KServe's V2 Open Inference Protocol: metadata, JSON and binary inference forms
* ``fetch``      the URL fetch policy (off by default; allow-list; private ranges refused)
* ``decode``     image headers costed before decoding; pixel and memory budgets; turns per request
* ``predictor``  the classifier over a stored head, the dynamic batcher, device/precision checks
* ``admission``  body deadline and budget, slots, the bounded queue, saturation
* ``metrics``    Prometheus text exposition of the server's counters and histograms
* ``bases``      base weights stored once per fingerprint: where they are found, how checked
* ``bundle``     the served model's files (delta, head, model_ref.json) and how they load
* ``wheel``      the project wheel and pins a logged model's environment installs

Above them: ``server`` (``saft serve``: the HTTP endpoint a KServe predictor runs, loading
the pyfunc of ``saft.tracking.pyfunc``), ``kserve`` (the InferenceService manifest, deployment
modes and what each can do; the API server validates it), ``kube`` (the Kubernetes API calls) and ``rollout`` (canary, promotion,
rollback), which ``saft.steps.deploy`` drives. See docs/serving.md.
"""
