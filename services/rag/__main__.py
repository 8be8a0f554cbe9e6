from services.rag.app import create_app
from services.rag.settings import RAGSettings
from shared.runner import serve

serve("rag", RAGSettings, create_app)
