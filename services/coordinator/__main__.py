from services.coordinator.app import create_app
from services.coordinator.settings import CoordinatorSettings
from shared.runner import serve

serve("coordinator", CoordinatorSettings, create_app)
