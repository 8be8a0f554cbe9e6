from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from shared.runner import serve

serve("gateway", GatewaySettings, create_app, edge=True)
