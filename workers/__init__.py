"""proxyprefill.workers"""
