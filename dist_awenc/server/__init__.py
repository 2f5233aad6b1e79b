"""``awenc serve``: the pirate's deployed model as an HTTP prediction service (:mod:`~dist_awenc.server.app`) and
what a request to it may hold (:mod:`~dist_awenc.server.requests`). Black-box verification is its client
(:mod:`dist_awenc.verify.endpoint`, over HTTP only); in the package only the CLI imports it."""
