"""The HTTP API (API Gateway HTTP API, payload v2), served by the token broker function.

Each area registers its routes on its own Powertools ``Router``; ``build_resolver`` includes them
and maps every domain error to one HTTP status in one place.
"""
