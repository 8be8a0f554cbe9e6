from services.llm.app import create_app
from services.llm.settings import LLMSettings
from shared.runner import serve

serve("llm", LLMSettings, create_app)
