"""Health: can this web process reach its database, broker and artifact store?"""
