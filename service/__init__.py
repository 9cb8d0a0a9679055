"""proxyprefill.service"""
