from proxy import create_app, run_dev_server

if __name__ == "__main__":
    run_dev_server()  # python app.py: development server on the same settings
else:
    app = create_app()
