"""MLflow: tracking set-up and run logging (`tracking`), the pyfunc model (`pyfunc`), and the
promotion rule between the `challenger` and `champion` aliases (`promotion`)."""
