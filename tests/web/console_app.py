"""The billing service for ``tidings serve --app tests.web.console_app:service`` (its store comes
from ``--store``); not broken, so a retried dead letter is processed."""

from tests.web.world import Switch, billing_service

service = billing_service(None, Switch(broken=False))
