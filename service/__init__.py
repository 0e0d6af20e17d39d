"""Recycling-bin classifier service: image bytes in, DeepMAD verdict out (no torch here).

Usage::

    make serve                                   # or: python -m service [--model-dir models/trashnet]
    curl -F file=@can.jpg http://127.0.0.1:8000/classify
    curl --data-binary @can.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/classify
    curl -F files=@a.jpg -F files=@b.jpg http://127.0.0.1:8000/classify/batch

Open http://127.0.0.1:8000/ for the upload page, /docs for the OpenAPI UI, /metrics for Prometheus;
the Open Inference Protocol v2 (KServe/Triton clients) is under /v2 (``service/oip/``: a codec over the
same ``Pipeline`` as /classify).
Settings are env vars ``DEEPMAD_*`` or flags (``python -m service --help``; every field of
``service.settings.Settings``). With ``--capture-dir`` the service keeps photos worth labelling;
operators label them on /review (``DEEPMAD_OPERATOR_TOKEN``). Reload the model folder with ``kill -HUP <pid>`` or
``curl -X POST -H "Authorization: Bearer $DEEPMAD_ADMIN_TOKEN" http://127.0.0.1:8000/admin/reload``;
a failed reload keeps the old model serving.
"""
