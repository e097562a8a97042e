"""Publishing Specialists to an environment: release state (``release``), the canary decision
and traffic split (``rollout``, pure), and the controller that applies both to a running Serve
app on a timer (``controller``)."""
