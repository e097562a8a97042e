"""Serving Specialists on Ray Serve: OpenAI-compatible HTTP, one deployment per base model with
every Specialist's LoRA adapter on it, and a signed-artifact check and a receipt for every call.

Pipeline: ``launch`` (``kolm serve``'s flags, typed, -> a ``config.ServeConfig``) ->
``catalog.build_catalog`` (verify every artifact; a bad one is refused with its reason, the rest
serve) -> ``app.build_app`` (a ``deployments.BaseModelServer`` per base, each hosting its adapters
in a ``host.AdapterHost``; an ``Ingress`` speaking ``protocol``'s OpenAI routes) -> ``app.run`` on
the cluster, or ``app.deploy_config`` for ``serve deploy``. Every served call is appended to the
hash-chained receipt log (``receipts``, under ``$KOLM_HOME/receipts/APP/``); a share of calls is
audited against the teacher off the request path (``audit``).

Which versions are live and the canary split of an environment come from ``kolm_ray.publish``.
"""
